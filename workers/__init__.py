"""RQ workers: flush and cleanup jobs, the flush trigger, the agent-backend client."""
