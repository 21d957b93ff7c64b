"""Where the gateway meets twisted.web's HTTP server, and goes beneath its
public API: the channel, request and Site (site.py), the hot-path fixes
(fastpath.py) and the list of every private reach (reaches.py)."""
