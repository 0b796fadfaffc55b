"""The text suite: all-MiniLM-L6-v2 and twenty text-classification tasks from packaged data."""
