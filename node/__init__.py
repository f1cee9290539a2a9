"""The organisation node: pull the global model, train on private data, commit on-chain, upload signed."""
