"""Wrappers around any mirror target (chunkvol/mirror/target.py) that inject faults."""

from chunkvol.errors import UnreachableError


class AcknowledgementLost:
    """Any target whose `nth` apply (send, or put for a PipelinedTarget) is applied and then
    fails as if the acknowledgement were lost on the way back. Everything else, READ_AHEAD and
    the pipelined calls included, is the wrapped target's, so the shipper treats it as it
    would the target itself."""

    def __init__(self, inner, nth):
        self.inner = inner
        self.nth = nth
        self.applies = 0

    def __getattr__(self, name):
        attribute = getattr(self.inner, name)
        if name not in ("send", "put"):
            return attribute

        def applied_then_lost(*arguments):
            held = attribute(*arguments)
            self.applies += 1
            if self.applies == self.nth:
                raise UnreachableError("the acknowledgement was lost")
            return held
        return applied_then_lost
