"""The Ray Train + DeepSpeed worker: stages A-D (worker.run_stages) and what they share. Importing it runs nothing:
a worker's process set-up is train.progress.setup_worker_process, called first in run_stages."""
