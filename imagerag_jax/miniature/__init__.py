"""The CPU miniature on scikit-learn's digits (docs/design.md, "The miniature").

data (splits, captions), fit (a small resumable loop), stages (VAE, text encoder, teacher,
student), judge (the digits classifier), report (the comparison), run (every stage in order).
"""
