"""Post-processing of global features into final rankings: kNN shortlists, query expansion (QE/DBA),
k-reciprocal re-ranking, calibration and fusion with local scores, and tune-post's search over them."""
