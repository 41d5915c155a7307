"""`python -m broker.simulator` runs the simulator in the foreground."""

from broker.simulator.cli import serve

if __name__ == "__main__":
    serve.main(prog_name="python -m broker.simulator")
