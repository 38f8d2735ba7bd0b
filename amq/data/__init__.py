"""Text sources (embedded and hub) and their tokenisation into fixed-length windows."""
