"""`python -m sandbox`: the same as `seedream-batch sandbox`."""

from sandbox.command import sandbox_command

if __name__ == "__main__":
    sandbox_command(prog_name="python -m sandbox")
