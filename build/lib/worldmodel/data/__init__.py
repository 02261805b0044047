"""Video data: shards from real video and game play, and a streaming loader over them."""

NULL_ACTION = -1
"""Action id of a frame whose source has no actions; models map it to a learned null embedding."""
