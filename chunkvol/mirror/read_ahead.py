"""Read ahead of a shipper: a generator runs in a background thread, one item ahead of its
caller, so that the next batch is read from disk (and encoded) while the current one is sent.

1. The thread makes an item only when the caller has taken the one before: at most two items
   exist at once, the caller's and the next one (the caller drops its own before it asks
   again).
2. The generator lives in the thread alone: it is started, advanced and closed there, so
   whatever it uses (the log source and its chunk table) is never touched by two threads.
3. An exception of the generator reaches the caller at the item where it happened, after
   every item before it.
4. `close` (also on leaving a `with` block, after an error or a stop) discards the item read
   ahead and returns once the thread has ended, which takes at most the making of one item.
"""

import queue
import threading

_ITEM, _END, _ERROR = "item", "end", "error"


class ReadAhead:
    def __init__(self, items, name="chunkvol-read-ahead"):
        self._items = items
        self._wanted = threading.Semaphore(0)  # released once for every item the caller may have next
        self._made = queue.SimpleQueue()  # (kind, value): never more than one waits here
        self._closing = False
        self._finished = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._wanted.release()

    def _run(self):
        try:
            while True:
                self._wanted.acquire()
                if self._closing:
                    return
                try:
                    item = next(self._items)
                except StopIteration:
                    self._made.put((_END, None))
                    return
                except BaseException as error:  # handed to the caller, which raises it
                    self._made.put((_ERROR, error))
                    return
                self._made.put((_ITEM, item))
                item = None
        finally:
            self._items.close()

    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        kind, value = self._made.get()
        if kind == _ITEM:
            self._wanted.release()  # make the next one while the caller works on this one
            return value
        self._finished = True
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self):
        self._closing = True
        self._finished = True
        self._wanted.release()  # a thread waiting to be asked ends at once
        self._thread.join()
        while not self._made.empty():  # the item read ahead, dropped
            self._made.get()

    def alive(self):
        return self._thread.is_alive()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()
