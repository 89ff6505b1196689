"""The CPU miniature on scikit-learn digits (DESIGN section 8): stages, run, report."""
