"""Glue between realb_hf and other tools. Each integration imports its tool lazily and names the pip extra
that provides it when the tool is missing."""
