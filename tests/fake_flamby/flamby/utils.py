"""Stand-in for flamby.utils: the licence question as FLamby's contract describes it (a question
on stdin unless a marker file sits in the dataset's dataset_creation_scripts folder)."""

import sys
from pathlib import Path

import flamby.datasets


def accept_license(license_link, dataset_name):
    """Ask once on stdin; a yes leaves the marker file, a no ends the program."""
    folder = Path(flamby.datasets.__file__).resolve().parent / dataset_name
    marker = folder / "dataset_creation_scripts" / f"license_agreement_{dataset_name}"
    if marker.exists():
        return
    answer = input(f"Do you accept the data terms at {license_link} ? | (y/n)\n\n\n")
    if answer.strip().lower() in ("y", "yes"):
        print("Saving license agreement")
        marker.touch()
        return
    print("The terms were not accepted.")
    sys.exit()
