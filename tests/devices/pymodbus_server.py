"""A Modbus TCP server that is not ours (pymodbus), for the driver tests.

Holding registers 100-101 hold 21.5 as an IEEE-754 float in little word
order (low word first, "CDAB"); coil 5 is a heater. Prints "ready" once it
listens on 127.0.0.1:<port>.
"""

import struct
import sys
import threading

from pymodbus.datastore import ModbusSequentialDataBlock, ModbusServerContext, ModbusSlaveContext
from pymodbus.server import StartTcpServer


def main() -> None:
    port = int(sys.argv[1])
    high, low = struct.unpack(">HH", struct.pack(">f", 21.5))
    holding = ModbusSequentialDataBlock(0, [0] * 200)
    holding.setValues(100, [low, high])
    coils = ModbusSequentialDataBlock(0, [False] * 16)
    store = ModbusSlaveContext(hr=holding, co=coils, zero_mode=True)
    context = ModbusServerContext(slaves=store, single=True)

    def announce() -> None:
        import socket
        import time

        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                print("ready", flush=True)
                return
            except OSError:
                time.sleep(0.05)

    threading.Thread(target=announce, daemon=True).start()
    StartTcpServer(context=context, address=("127.0.0.1", port))


if __name__ == "__main__":
    main()
