"""One module per backend, each a ``BackendPass``; ``order`` says when each one runs."""
