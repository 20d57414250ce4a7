"""Open-set identification against a gallery: calibration of the new-individual threshold on
validation, identification of new photos, enrolment into the gallery."""
