"""EC2: the launch request built from settings (launch_spec.py), the instance lifecycle (ec2.py), the checks before a
launch (preflight.py), host keys and user-data (hostkeys.py, user_data.py), and the launch / terminate / reap tasks
(tasks.py, operators.py)."""
