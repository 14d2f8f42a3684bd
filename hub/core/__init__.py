"""The queue core: what any kiri hub is, before it knows of atoms.

``transport`` takes bytes off sockets and enforces the limits that hold without a token;
``commit`` runs the requests that arrived together in one transaction and answers them
after it commits; ``wakeups`` hands tasks to waiting leases and keeps time (due tasks,
the reaper, schedules, WAL checkpoints); ``queue`` holds the task rules themselves
(enqueue, lease, heartbeat, checkpoint, ack, fail); ``events`` tells subscribers what changed.
"""
