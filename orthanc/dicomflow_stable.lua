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

local earlierOnStableSeries = OnStableSeries
local earlierOnStableStudy = OnStableStudy

local function handOver(level, resourceId)
  if RestApiPost('/dicomflow/stable/' .. level, resourceId, false) == nil then
    -- Orthanc has logged why (the plugin is not loaded, or refused the id).
    print('dicomflow: the plugin did not take stable ' .. level .. ' ' .. resourceId)
  end
end

function OnStableSeries(seriesId, tags, metadata)
  handOver('series', seriesId)
  if earlierOnStableSeries ~= nil then
    earlierOnStableSeries(seriesId, tags, metadata)
  end
end

function OnStableStudy(studyId, tags, metadata)
  handOver('study', studyId)
  if earlierOnStableStudy ~= nil then
    earlierOnStableStudy(studyId, tags, metadata)
  end
end
