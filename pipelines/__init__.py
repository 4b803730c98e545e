"""maskmix corpus pipeline: Ray Data stages from raw documents to tokenized shards."""
