from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
