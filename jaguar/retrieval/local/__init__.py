"""Local pattern evidence: keypoints and descriptors on the animal's coat (the alpha mask bounds the
detector), matched between a query and its global shortlist with geometric verification; the inlier
count is the local score that post-processing calibrates and fuses with the global similarity."""
