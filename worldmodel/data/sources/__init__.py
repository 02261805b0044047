"""Sources that turn raw material (video files, game play) into shards."""
