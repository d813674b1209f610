"""Stage 6, studies: one module per notebook (named after it), the shared figures, and the
results files they write and the report reads."""
