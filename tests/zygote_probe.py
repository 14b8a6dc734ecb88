"""A stand-in tool for tests/test_zygote.py: ends the way its argument says, as a tlexp tool may."""

import atexit
import os
import signal
import sys
import threading
import time

print("out", os.environ.get("PROBE"), os.getcwd(), sys.argv[1:])
print("err", file=sys.stderr)
atexit.register(print, "atexit")
threading.Thread(target=lambda: (time.sleep(0.2), print("thread"))).start()
how = sys.argv[1]
if how == "exit_3":
    sys.exit(3)
if how == "exit_text":
    sys.exit("a message")
if how == "raise":
    raise ValueError("boom")
if how == "ctrl_c":
    raise KeyboardInterrupt
if how == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if how == "sleep":
    time.sleep(60)
