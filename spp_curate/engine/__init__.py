"""Where stages run. The local engine is the stage code itself; ``ray_engine`` distributes it over a Ray cluster.

The local path imports nothing from here: each stage imports the Ray engine
only when the recipe says ``engine: ray``.
"""
