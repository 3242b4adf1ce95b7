"""The conductor: the only place (with ``hetray/cli.py``) that starts Ray and sequences stages."""
