"""``python -m model_server``: see :mod:`model_server.server`."""

from model_server.server import serve

serve()
