"""`imgdedup eval` and `imgdedup groups`: measure the real pipeline on known duplicates and turn
verdicts into duplicate groups. Every default threshold in imgdedup comes from a run of this code."""
