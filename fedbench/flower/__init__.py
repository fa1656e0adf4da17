"""The Flower bridge (issue 27): any fedbench method on Flower, simulated (`fedbench flower
run`) or deployed (`fedbench flower new` writes the app). Needs the `flower` extra; nothing in
fedbench imports this package but its own command."""
