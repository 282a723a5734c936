"""The CNTK worker: runs in the Python 3.6 environment, speaks ``protocol`` over stdin/stdout.

Nothing here may need more than Python 3.6 + numpy 1.19: this package is imported by both
interpreters (the host imports ``protocol`` only).
"""
