-- dicomflow: Orthanc's stable series and studies, handed to the dicomflow plugin.
--
-- Orthanc's Lua engine calls these once per series/study that became stable (StableAge
-- seconds without a new instance), never per instance. Each queues the resource's event in
-- the Python plugin through its REST route; the plugin then reads the series/study from
-- Orthanc and delivers it with the instance events, in order. Listed in Orthanc's
-- "LuaScripts", this script also tells the plugin not to read Orthanc's change log while it
-- runs (reading every change cost Orthanc ~6 us per instance).
--
-- Load it after your own scripts: an OnStableSeries/OnStableStudy defined before it is
-- still called, after the plugin's.

local function handOver(level, resourceId)
  if RestApiPost('/dicomflow/stable/' .. level, resourceId, false) == nil then
    -- Orthanc has logged why (the plugin is not loaded, or refused the id).
    print('dicomflow: the plugin did not take stable ' .. level .. ' ' .. resourceId)
  end
end

-- The callback for `level`, calling `earlier` (a script's own, loaded before this one) after.
local function handingOver(level, earlier)
  return function(resourceId, tags, metadata)
    handOver(level, resourceId)
    if earlier ~= nil then
      earlier(resourceId, tags, metadata)
    end
  end
end

OnStableSeries = handingOver('series', OnStableSeries)
OnStableStudy = handingOver('study', OnStableStudy)
