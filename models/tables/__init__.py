"""The machinery that stores and serves Engram table rows, apart from the model family.

The model (``models.engram.Engram``) calls one table interface, ``forward(hash_ids, plan)`` and
``planner()``, and never knows where the rows live. Behind it:

```
 loader worker                         trainer process
 ------------------------------        -----------------------------------------------------
 hash ids [B, T, K]                    table.py   EngramTable      the in-memory flat table
   |  RowPlanner (table.py)                         |  RowGradBuffer: one coalesced sparse
   v                                                |  gradient over the step's unique rows
 RowPlan: unique rows + counts  ---->               |
                                       offload.py OffloadedEngramTable / OffloadedShardedTable
                                                    |  the same calls, rows off the device;
                                                    |  OffloadedTables.prefetch(next batch)
                                                    v
                                       tier.py    RowCache   device slots of the rows in use
                                                    |  (LRU by batch, pinned until updated)
                                                  RowStore   every record [w | m | v]:
                                                             host memory or a disk memory map
```

Row-sharded tables (``parallel.engram_table_parallel.ShardedEngramTable``) are parallelism and
live in ``parallel/``; ``offload.py`` gives their shards the same host and disk tiers.

Modules are imported by name (``from models.tables.table import EngramTable``), never through
this package: the HF export copies the modules the model reaches into one flat folder
(``models/hf/remote_code.py``), which is why their file names are unique in ``models/``.
"""
