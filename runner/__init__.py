"""The reference runner and the client SDK of agentrun: plain Python over HTTP (httpx).

Nothing here imports Django or the server's code: the runner talks to the manager only through
the v1 API. It is not shipped apart: the one agentrun image (deploy/Dockerfile) holds the server
and the runner alike, and a runner Job runs that image (`AGENTRUN_RUNNER_IMAGE`) as
`python -m runner`.
"""
