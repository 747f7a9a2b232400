"""Data shipped with dsjax: the embedded offline corpus (`dsjax.data.corpus`)."""
