"""Running a federation: Flower's simulation engine, a real federation on one machine, the deployment
engine's commands and processes, the config files a node and a coordinator start from, their certificates."""
