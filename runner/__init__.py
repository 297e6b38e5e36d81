"""The reference runner and the client SDK of agentrun: plain Python over HTTP (httpx).

Nothing here imports Django or the server's code: a runner pod ships this package alone.
"""
