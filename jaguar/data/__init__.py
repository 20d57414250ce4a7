"""Data: synthetic jaguars, shard preparation, shard reading, sampling and augmentation."""
