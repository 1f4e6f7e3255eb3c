from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
from .reversible import Reversible as Reversible
