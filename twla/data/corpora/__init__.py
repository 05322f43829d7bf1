"""The built-in public-domain texts (files beside this module) and the hub datasets twla knows by name."""

CORPORA = {
    "emma": "austen_emma.txt",
    "mansfieldpark": "austen_mansfieldpark.txt",
    "prideprejudice": "austen_prideprejudice.txt",
    "persuasion": "austen_persuasion.txt",
    "northangerabbey": "austen_northangerabbey.txt",
    "sensesensibility": "austen_sensesensibility.txt",
    "mobydick": "melville_mobydick.txt",
}
HUB_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", {"calibration": "train", "evaluation": "test"}, "\n\n"),
    "c4": ("allenai/c4", "en", {"calibration": "train", "evaluation": "validation"}, " "),
}
