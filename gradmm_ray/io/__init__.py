"""Files: the real-data reader (``real_data``: the only module that reads real rows, used by
stage 1 alone), the output directory (``storage``) and the identity of a run's inputs."""
