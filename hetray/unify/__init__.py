"""Step 1 of the paper: every feedback dataset -> one binary-preference format (``convert``)."""
