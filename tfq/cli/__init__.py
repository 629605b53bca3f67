"""The `tfq` command (`main`), the helpers its absl programs and `scripts/` share (`flags`), and the
quickstart job."""
