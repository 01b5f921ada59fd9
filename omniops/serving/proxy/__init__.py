"""omni-proxy: prefill/decode disaggregation and request-level load balancing in front of omni-serve (or vLLM)
engines. Policies are plain functions (``policies``); ``router`` routes and retries; ``app`` is the HTTP
front; ``cli`` the command line."""
