"""chunkvol: a virtual block device on a log-structured chunk store.

Data flow: nbdkit_plugin/ (adapter) -> chunkvol.volume -> chunkvol.log (writer, reader,
recovery) -> chunkvol.storage (chunks, files), with chunkvol.index (block map) beside the log.
"""

__version__ = "0.1.0"
FORMAT_VERSION = 1
