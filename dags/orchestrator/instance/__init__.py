"""The running instance: SSH (ssh.py), the ready wait (ready.py), the training command and remote job (command.py,
job_script.py, remote_job.py, source_tree.py), the post-mortem bundle, and the operators (operators.py,
training_operator.py) and triggers that drive them."""
