"""The teacher's one pass: labels of every (sample, view) or token into sharded datasets."""
