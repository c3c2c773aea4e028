# dask-gateway-server configuration for a local test server (loopback only).
c = get_config()  # noqa: F821  (injected by dask-gateway-server)
c.Gateway.address = "127.0.0.1:8000"
c.Proxy.address = "127.0.0.1:8001"
c.Gateway.backend_class = "dask_gateway_server.backends.local.UnsafeLocalBackend"
c.Gateway.authenticator_class = "dask_gateway_server.auth.SimpleAuthenticator"
c.ClusterConfig.worker_cores = 1
c.ClusterConfig.worker_memory = "2 G"
c.ClusterConfig.idle_timeout = 600
