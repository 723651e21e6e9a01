"""Transport: everything that moves bytes between processes: the Redis-Streams trajectory queue, its
codec and embedded server, and weight sync from the learner to the generators."""
