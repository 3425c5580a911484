"""OpenAI Batch compatibility: input lines in, output and error lines out, the Files and
Batches objects. Pure: it knows the wire formats, not the service."""
