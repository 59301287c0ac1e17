"""The operator web dashboard served by the releaser (issue 16; README "Web dashboard").

``serve_dashboard`` runs it in the releaser's nursery (server/app.py);
``make_token`` is what ``fleetpush operator web-login`` signs.
"""

from .login import LoginError, make_token
from .serve import serve_dashboard

__all__ = ["LoginError", "make_token", "serve_dashboard"]
