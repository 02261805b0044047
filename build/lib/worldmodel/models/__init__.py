"""The two networks of the world model, free of training and distribution code."""
