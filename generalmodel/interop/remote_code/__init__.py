"""The remote-code files a transformers export carries (see generalmodel/interop/remote.py). They run
only inside an export directory, beside the zoo's modules: nothing imports them from here."""
