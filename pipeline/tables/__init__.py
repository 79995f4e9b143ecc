"""Computations over a run's tables with pandas and dask.dataframe, for ``stage=stats``: the groupings of its
tables, the pointing game, and the agreement between runs. Nothing here knows about stages or clusters."""
